"""esmm-spark: ESMM (Ma et al., SIGIR 2018) and its competitors, trained and evaluated at Spark scale."""
__version__ = "0.1.0"
