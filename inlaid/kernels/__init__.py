"""inlaid.kernels"""
