"""metarec: an online recommendation service that meta-learns from every closed time slot."""

__version__ = "0.1.0"
