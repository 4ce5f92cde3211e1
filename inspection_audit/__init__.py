"""inspection-audit: asynchronous explanation-based audit of an ok/defect classifier."""

__version__ = "0.1.0"
