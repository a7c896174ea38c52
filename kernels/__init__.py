"""kvruntime.kernels"""
