"""inlaid.server"""
