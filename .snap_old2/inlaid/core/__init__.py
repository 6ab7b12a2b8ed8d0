"""inlaid.core"""
