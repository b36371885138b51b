"""The library's version: the one source for ``shared_backbone.__version__``, pyproject's version
and the ``library_version`` written into saved files (modules import it from here, never from the
package's ``__init__``)."""
__version__ = "0.1.0"
