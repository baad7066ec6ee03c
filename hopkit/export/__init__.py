"""hopkit.export: autocast regions of exported graphs as ``wrap_with_autocast`` HOP calls.

    from hopkit.export import replace_autocast_with_hop_pass, wrap_with_autocast
    gm, sig = replace_autocast_with_hop_pass(gm, graph_signature)   # sig may be None

    ep = hopkit.export.export(model, args)   # torch.export.export, regions as hopkit HOPs
    gm, sig = inline_autocast_hops_pass(gm, sig)   # the inverse

    ep = inline_hops(ep)                 # every hopkit HOP call replaced by its body
    table = onnx_translations()          # torch.onnx.export(..., custom_translation_table=table)

``wrap_with_autocast`` is the HOP (``_autocast_hop.py``), the pass is in
``_pass.py``, ``export`` and the inverse pass in ``_export.py``, ``inline_hops``
in ``_inline.py``, ``onnx_translations`` in ``_onnx.py`` (it imports onnxscript
only when called).
"""

from hopkit.export._autocast_hop import WrapWithAutocast as WrapWithAutocast
from hopkit.export._autocast_hop import wrap_with_autocast as wrap_with_autocast
from hopkit.export._export import export as export
from hopkit.export._export import inline_autocast_hops_pass as inline_autocast_hops_pass
from hopkit.export._inline import inline_hops as inline_hops
from hopkit.export._onnx import onnx_translations as onnx_translations
from hopkit.export._pass import is_enter_autocast as is_enter_autocast
from hopkit.export._pass import is_exit_autocast as is_exit_autocast
from hopkit.export._pass import replace_autocast_with_hop_pass as replace_autocast_with_hop_pass

__all__ = [
    "WrapWithAutocast",
    "export",
    "inline_autocast_hops_pass",
    "inline_hops",
    "is_enter_autocast",
    "is_exit_autocast",
    "onnx_translations",
    "replace_autocast_with_hop_pass",
    "wrap_with_autocast",
]
