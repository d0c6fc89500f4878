"""emlib: the library behind the EM book (reproducing arXiv 2602.07852)."""
__version__ = "0.1.0"
