"""inlaid.lora"""
