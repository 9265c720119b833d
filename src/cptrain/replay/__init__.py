"""Experience replay: a disk-backed, crash-safe buffer (``buffer``, ``storage``), admission
policies (``policies``), prefetch (``prefetch``), mixing (``mixer``), seeding (``seeding``) and
the ``replay:`` config section (``config``, torch- and numpy-free so configs load fast).

Import the submodules directly; this package imports nothing, so reading a config does not
load numpy."""
