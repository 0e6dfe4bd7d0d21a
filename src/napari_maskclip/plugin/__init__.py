"""Everything napari-specific: the dock panels and the napari adapters behind them.

* ``_qt/``: the Qt panels (Segment, Export, Train), their sections and shared controls, and the
  one job runner that runs their work in napari workers;
* beside it, Qt-free napari adapters: :mod:`.layers` (results -> layers, the re-run rule),
  :mod:`.records` (what a run stores on a layer), :mod:`.edits` (which pixels were painted),
  :mod:`.export_plan` (a Labels layer -> an export), :mod:`.models` (loaded models, reused),
  :mod:`.preferences` (what the panels remember), :mod:`.notify` (how problems reach the user),
  :mod:`.jobs`, :mod:`.stack_run` and :mod:`.train_job` (the work, as progress generators);
* the npe2 contributions named in ``napari.yaml``: :mod:`.sample_data`, :mod:`.writer` and the
  panels.

Nothing here is imported by the core or the CLI's commands except to open napari. Importing this
package loads nothing: torch and Qt load only when a panel or command runs.
"""
