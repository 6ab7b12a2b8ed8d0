"""inlaid.model"""
