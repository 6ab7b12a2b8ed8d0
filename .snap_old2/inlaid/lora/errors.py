"""Typed errors of the LoRA package; all are ``ValueError`` so the edge can catch them as bad input."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter directory or adapter cannot be used (the message says what to fix)."""


class IncompatibleAdapterError(AdapterError):
    """A well-formed adapter that does not fit this base model or these limits."""


class UnknownAdapterError(AdapterError):
    """An adapter name that is not registered."""


class DuplicateAdapterError(AdapterError):
    """An adapter name that is already registered."""
