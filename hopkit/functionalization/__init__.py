"""hopkit.functionalization: torch's ViewMeta, reimplemented in Python.

Two parts:

* The naming and binding API of torchgen's ``api/functionalization.py``
  (:func:`classname`, :func:`name`, :func:`reverse_name`,
  :func:`returns_type`, :func:`is_multi_output`,
  :func:`base_ctor_arguments`, :func:`extra_ctor_arguments`,
  :func:`attributes`, :func:`op_arguments`), computed from
  ``torchgen.model``; see ``_naming.py``.
* :class:`ViewMeta`: one view op that replays on a new base (``forward``)
  and inverts (``reverse``), with :func:`apply_view_meta_sequence`,
  :func:`scatter_into_base` (mutation through a view, used by BaseHOP) and
  :func:`record_view_metas`.

Modules, each imported only by those after it (no cycles; from hopkit only
``hopkit._compat`` and ``hopkit._dispatch``; tests/test_functionalization.py
checks both):

* ``_torchgen``: the only importer of torchgen.
* ``_naming``: the naming and binding API.
* ``_geometry``: :class:`ViewGeometry`, where a view sits in its base's storage.
* ``_ops``: naming and finding operator overloads.
* ``_protocol``: ``ViewMetaLike``, what the rule modules use of a ViewMeta.
* ``_checks``: argument checks and error messages of ViewMeta.
* ``_tensor_methods``: the Tensor method each view op replays with.
* ``_as_strided``: the verified as_strided fallback (forward and inverse).
* ``_inverse_rules``: one inverse rule per view op.
* ``_replay_cache``: the geometry caches (eager replay, reverse's check).
* ``_pickle``: pickling by qualified op name.
* ``_torch_classes``: conversion to and from torch's generated classes.
* ``_view_meta``: the :class:`ViewMeta` class, assembled from the above.
* ``_sequences``: :func:`apply_view_meta_sequence`, :func:`scatter_into_base`.
* ``_record``: :func:`record_view_metas`.
"""

from hopkit.functionalization._naming import Binding as Binding
from hopkit.functionalization._naming import attributes as attributes
from hopkit.functionalization._naming import base_binding as base_binding
from hopkit.functionalization._naming import base_ctor_arguments as base_ctor_arguments
from hopkit.functionalization._naming import classname as classname
from hopkit.functionalization._naming import extra_ctor_arguments as extra_ctor_arguments
from hopkit.functionalization._naming import (
    has_symbolic_inputs_binding as has_symbolic_inputs_binding,
)
from hopkit.functionalization._naming import (
    inverse_return_mode_binding as inverse_return_mode_binding,
)
from hopkit.functionalization._naming import is_multi_output as is_multi_output
from hopkit.functionalization._naming import mutated_view_binding as mutated_view_binding
from hopkit.functionalization._naming import name as name
from hopkit.functionalization._naming import op_arguments as op_arguments
from hopkit.functionalization._naming import out_index_binding as out_index_binding
from hopkit.functionalization._naming import reapply_views_binding as reapply_views_binding
from hopkit.functionalization._naming import returns_type as returns_type
from hopkit.functionalization._naming import reverse_name as reverse_name
from hopkit.functionalization._naming import view_groups as view_groups
from hopkit.functionalization._geometry import ViewGeometry as ViewGeometry
from hopkit.functionalization._record import record_view_metas as record_view_metas
from hopkit.functionalization._sequences import (
    apply_view_meta_sequence as apply_view_meta_sequence,
)
from hopkit.functionalization._sequences import scatter_into_base as scatter_into_base
from hopkit.functionalization._view_meta import ViewMeta as ViewMeta

__all__ = [
    "Binding",
    "ViewGeometry",
    "ViewMeta",
    "apply_view_meta_sequence",
    "attributes",
    "base_binding",
    "base_ctor_arguments",
    "classname",
    "extra_ctor_arguments",
    "has_symbolic_inputs_binding",
    "inverse_return_mode_binding",
    "is_multi_output",
    "mutated_view_binding",
    "name",
    "op_arguments",
    "out_index_binding",
    "reapply_views_binding",
    "record_view_metas",
    "returns_type",
    "reverse_name",
    "scatter_into_base",
    "view_groups",
]
