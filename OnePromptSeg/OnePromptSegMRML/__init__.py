"""The MRML adapter of OnePromptSeg: Slicer nodes -> arrays, geometry and prompts -> the engine -> segments.

No Qt, no CTK, no scripted-module framework: it imports numpy, vtk, Slicer's MRML classes and ``slicer.util`` and
OnePromptSegLib only, so the test suite runs it on real MRML nodes (PyPI's ``slicer-core``) without Slicer.

* ``volumes``: a volume's voxels and IJK-to-world geometry (parent transforms included), a view's slice axis;
* ``segments``: a segment read onto a volume's grid and written back, in world coordinates, with no temporary node;
* ``promptnodes``: markups, ROIs and segments -> the library's prompts;
* ``logic``: one run of the engine on nodes, the correction loop, undo.
"""
