"""Hot paths with a Cython twin and a pure-Python twin of the same API (see STYLE.md)."""
