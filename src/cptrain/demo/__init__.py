"""The demos: the embedded multilingual corpus (sources, cleaning, build) and `cptrain demo`
(embedded and released-model)."""
