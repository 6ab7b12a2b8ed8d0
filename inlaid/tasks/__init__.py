"""inlaid.tasks"""
