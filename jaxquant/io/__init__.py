"""Saving and loading quantized parameter trees and models."""
