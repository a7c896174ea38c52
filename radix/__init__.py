"""kvruntime.radix"""
