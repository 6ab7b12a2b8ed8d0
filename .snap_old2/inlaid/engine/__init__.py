"""inlaid.engine"""
