__version__ = "3.12.6+stub"
