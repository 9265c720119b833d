"""`cptrain plan`: predict forgetting and learning for any replay ratio and learning rate from a
few short pilot runs, and recommend a setting within a forgetting budget. ``law`` is the fit
(pure numpy / scipy), ``config`` the torch-free plan file, ``pilots`` designs and trains the
pilots (a sweep underneath), ``predict`` turns fits into candidates and a recommendation,
``output`` writes plan.json / plan.md / plan.html and the figures."""
