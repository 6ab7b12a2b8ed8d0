"""inlaid.bench"""
