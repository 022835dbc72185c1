"""Qt-free code of the MedDL Slicer modules: geometry, MRML nodes ⇄ engine files, models, batches, engine set-up.

Nothing here imports Qt, CTK, torch, MONAI or SimpleITK, so it runs in Slicer's GUI process, in ``PythonSlicer``
and headless with ``slicer-core`` (tests, web front end). Functions take the MRML scene and module logics as
arguments. This is a sub-package (not ``.py`` files directly in the module folder) because Slicer loads every
``.py`` of a module folder as a module.
"""
