"""emlib: the library behind the EM book (reproducing arXiv 2602.07852)."""
import warnings as _warnings

# peft probes this deprecated transformers property on every adapter injection; the warning is noise.
_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

__version__ = "0.1.0"
