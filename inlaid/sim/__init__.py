"""inlaid.sim"""
