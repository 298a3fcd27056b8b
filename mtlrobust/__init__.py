"""Robust medical-image models through multi-task learning, on fastai, timm and torchattacks"""
