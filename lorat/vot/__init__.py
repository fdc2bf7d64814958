"""LoRAT in the VOT toolkit (VOT and VOTS challenges), over the TraX protocol.

* :mod:`lorat.vot.server` -- ``python -m lorat.vot``: the TraX tracker.
* :mod:`lorat.vot.session` -- the tracking side of a session: regions in, boxes or masks out.
* :mod:`lorat.vot.masks` -- masks from boxes: Segment Anything prompted with each box, or the box filled.
* :mod:`lorat.vot.workspace` -- ``python -m lorat.vot.workspace``: a ready toolkit workspace.
"""
