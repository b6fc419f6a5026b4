"""Standalone HTML for a :class:`~flex_surgery.viz.hook_map.HookMap`.

One file, no scripts, nothing fetched: the tree is nested ``<details>`` elements (expand and
collapse work in any browser without JavaScript), styles are inline CSS, and each sharded
weight gets a small inline SVG: the full weight cut into its shards along the sharded dim, this
rank's shard filled.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from flex_surgery.viz.hook_map import _SHORT_KIND

if TYPE_CHECKING:
    from flex_surgery.viz.hook_map import HookMap, ModuleNode, ParamInfo

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1f2328}
h1{font-size:20px;margin:0 0 4px} .hdr{color:#57606a;margin:2px 0}
details{margin-left:18px} details.table{margin:16px 0 0} summary{cursor:pointer;white-space:nowrap}
summary::marker{color:#8c959f} .leaf{margin-left:18px;padding-left:14px;white-space:nowrap}
.name{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-weight:600}
.type{color:#0969da;margin-left:6px} .count{color:#8250df;margin-left:4px}
.badge{display:inline-block;border-radius:9px;padding:0 7px;margin-left:5px;font-size:12px}
.hook{background:#dafbe1;color:#116329} .hook.edit{background:#ffebe9;color:#a40e26}
.wrap{background:#fff8c5;color:#7d4e00} .kinds{color:#8c959f;font-size:12px;margin-left:6px}
.param{font-family:ui-monospace,monospace;font-size:12px;color:#57606a;margin-left:8px}
.param.sh{color:#953800} svg{vertical-align:middle;margin-left:4px}
table{border-collapse:collapse;margin:12px 0 18px} td,th{border:1px solid #d0d7de;padding:3px 8px;
font-size:13px;text-align:left} th{background:#f6f8fa}
.legend{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;
margin:10px 0 14px;font-size:13px}
"""


def render_html(hmap: HookMap, collapse: bool = True) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{escape(hmap.title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{escape(hmap.title)}</h1>"]
    parts += [f'<p class="hdr">{escape(line)}</p>' for line in hmap.header]
    parts.append(
        '<div class="legend">Every module takes <b>forward</b>, <b>forward_pre</b> and '
        "<b>full_backward_pre</b> hooks, and <b>full_backward</b> unless its inputs are integer "
        "ids; parameters take <b>tensor</b> (gradient) hooks: listed per module as "
        "[fwd pre bwd bwd_pre grad]. "
        '<span class="badge hook">read</span> hooks store the whole tensor, '
        '<span class="badge hook edit">edit</span> hooks replace it. Shapes read '
        "<i>full placement &rarr; local</i>; the picture shows the weight cut into shards, this "
        "rank's shard filled.</div>")
    parts.append(_node(hmap.root, "", 1, collapse, top=True))
    hooks = hmap.hooks
    if hooks:  # every hook once, uncollapsed; open by default only when short
        is_open = " open" if len(hooks) <= 12 else ""
        parts.append(f'<details class="table"{is_open}><summary><b>{len(hooks)} registered '
                     "hooks</b></summary>")
        parts.append("<table><tr><th>module</th><th>kind</th><th>does</th><th>groups</th>"
                     "<th>output_dict key</th></tr>")
        for name, h in hooks:
            target = f"{name}.{h.parameter}" if h.parameter else name
            parts.append(
                f"<tr><td class=name>{escape(target or '(root)')}</td><td>{h.kind}</td>"
                f"<td>{'edit' if h.edits else 'read'}</td>"
                f"<td>{escape(', '.join(('all',) + h.groups))}</td>"
                f"<td><code>{escape(h.key or '')}</code></td></tr>")
        parts.append("</table></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _node(node: ModuleNode, label: str, count: int, collapse: bool, top: bool = False) -> str:
    from flex_surgery.viz.hook_map import collapsed_children

    head = [f'<span class="name">{escape(label)}</span>'] if label else []
    if count > 1:
        head.append(f'<span class="count">&times;{count}</span>')
    head.append(f'<span class="type">{escape(node.type_name)}</span>')
    head += [f'<span class="badge wrap">{escape(w)}</span>' for w in node.wrappers]
    for h in node.hooks:
        cls = "hook edit" if h.edits else "hook"
        head.append(f'<span class="badge {cls}" title="{escape(h.key or "")}">'
                    f"{escape(h.label())}</span>")
    kinds = " ".join(_SHORT_KIND[k] for k in node.hookable)
    head.append(f'<span class="kinds" title="hook kinds that apply">[{kinds}]</span>')
    head += [_param(p) for p in node.params]
    if not node.children:
        return f'<div class="leaf">{"".join(head)}</div>'
    inner = "".join(_node(c, lbl, n, collapse) for c, lbl, n in collapsed_children(node, collapse))
    is_open = " open" if top or node.hooks or any(c.hooks for c in node.walk()) else ""
    return f"<details{is_open}><summary>{''.join(head)}</summary>{inner}</details>"


def _param(p: ParamInfo) -> str:
    cls = "param sh" if p.sharded else "param"
    svg = _shard_svg(p) if p.sharded and p.shard_dim is not None and p.num_shards > 1 else ""
    return f'<span class="{cls}">{escape(p.label())}</span>{svg}'


def _shard_svg(p: ParamInfo) -> str:
    """The weight as a rectangle cut along its sharded dim (rows for dim 0), this rank filled."""
    w, h, n = 60, 18, p.num_shards
    rows = p.shard_dim == 0 or len(p.full_shape) == 1
    cells = []
    for i in range(n):
        fill = "#fb8f44" if i == p.shard_index else "#fff1e5"
        if rows and len(p.full_shape) > 1:
            y, hh = h * i / n, h / n
            cells.append(f'<rect x="0" y="{y:.1f}" width="{w}" height="{hh:.1f}" fill="{fill}" '
                         'stroke="#bc4c00" stroke-width="0.6"/>')
        else:
            x, ww = w * i / n, w / n
            cells.append(f'<rect x="{x:.1f}" y="0" width="{ww:.1f}" height="{h}" fill="{fill}" '
                         'stroke="#bc4c00" stroke-width="0.6"/>')
    title = f"<title>shard {p.shard_index} of {n} along dim {p.shard_dim}</title>"
    return (f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            f'xmlns="http://www.w3.org/2000/svg" role="img">{title}{"".join(cells)}</svg>')
