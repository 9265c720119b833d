"""The demos: the embedded multilingual corpus (``sources``, ``packages``, ``cleaning``,
``manifest``, built by ``corpus``) and `cptrain demo` (``embedded``: plain and released-model,
their settings read from the repository's recipes by ``recipes``)."""
