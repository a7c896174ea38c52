"""kvruntime.store"""
