"""inlaid.quant"""
