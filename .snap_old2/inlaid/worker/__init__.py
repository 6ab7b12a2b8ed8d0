"""inlaid.worker"""
