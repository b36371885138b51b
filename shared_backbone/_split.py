# The template builder now lives in _template.py; this re-export is kept until ensemble.py is updated.
from ._template import MemberBatchNorm2d, MemberConv2d, SplitConv2d, build_template, merge_param, template_key  # noqa: F401
