"""The report folder's files besides index.html: image thumbnails (thumbs/) and the id index
(ids/NNN.js), plus the page's inline CSS and JS.

The id index lists every pool record as [task number, outcome number, question score, question
rank, answer score, answer rank, rewrites accepted or -1] (the numbers index the page's
A2L.meta.tasks and A2L.meta.outcomes), in shards of about SHARD_ROWS rows chosen by an FNV-1a
hash of the id. The page loads the one shard an id needs through a <script> tag when someone
searches it (file:// pages may not fetch()), so the page stays small however large the pool.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

SHARD_ROWS = 2000


def fnv1a(text: str) -> int:
    """32-bit FNV-1a of the UTF-8 bytes (the page's JS computes the same)."""
    h = 0x811C9DC5
    for b in text.encode("utf-8"):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def shard_count(n_records: int) -> int:
    return max(1, math.ceil(n_records / SHARD_ROWS))


def write_id_index(rows: dict[str, list[Any]], out_dir: Path) -> int:
    """Write ids/NNN.js shards of {id: row}; returns the number of shards."""
    n = shard_count(len(rows))
    shards: list[dict[str, list[Any]]] = [{} for _ in range(n)]
    for rid, row in rows.items():
        shards[fnv1a(rid) % n][rid] = row
    d = out_dir / "ids"
    d.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        body = json.dumps(shard, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
        (d / f"{i:03d}.js").write_text(f"A2L.ids({i},{body});\n", encoding="utf-8")
    return n


class Thumbnails:
    """Small copies of record images under out_dir/thumbs/, one per distinct image path."""

    def __init__(self, image_root: str | Path, out_dir: Path, px: int):
        self.image_root, self.dir, self.px = Path(image_root), out_dir / "thumbs", px
        self.done: dict[str, str | None] = {}
        self.missing: list[str] = []
        self.bytes = 0

    def get(self, rel: Any) -> str | None:
        """The thumbnail's path relative to the report folder; None (and counted in `missing`)
        when the image is absent, outside the image root or does not decode."""
        if not isinstance(rel, str) or not rel:
            return None
        if rel in self.done:
            return self.done[rel]
        from align2llava.data.images import load_rgb, resolve_image
        from align2llava.errors import DataError

        try:
            im = load_rgb(resolve_image(self.image_root, rel))
        except DataError:
            self.missing.append(rel)
            self.done[rel] = None
            return None
        im.thumbnail((self.px, self.px))
        best = None
        for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
            buf = io.BytesIO()
            im.save(buf, fmt, **({"quality": 82, "optimize": True} if fmt == "JPEG" else {"optimize": True}))
            if best is None or buf.tell() < len(best[0]):
                best = (buf.getvalue(), ext)
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{hashlib.sha1(rel.encode('utf-8')).hexdigest()[:16]}.{best[1]}"
        (self.dir / name).write_bytes(best[0])
        self.bytes += len(best[0])
        self.done[rel] = f"thumbs/{name}"
        return self.done[rel]


CSS = """
:root{--kept:#2e7d32;--answer:#ef6c00;--question:#757575;--unscored:#6a1b9a;--ink:#1f2328;--mute:#57606a;--line:#d0d7de}
*{box-sizing:border-box}
body{font:14px/1.45 "DejaVu Sans","Liberation Sans",Arial,sans-serif;color:var(--ink);margin:0;background:#f6f8fa}
header{background:#fff;border-bottom:1px solid var(--line);padding:14px 24px;position:sticky;top:0;z-index:5}
header h1{font-size:20px;margin:0 0 4px}
header .sub{color:var(--mute);font-size:12px}
nav a{margin-right:12px;font-size:13px}
main{padding:8px 24px 40px;max-width:1400px}
section,.card{scroll-margin-top:110px}
section{background:#fff;border:1px solid var(--line);border-radius:6px;padding:12px 16px;margin:14px 0}
h2{font-size:17px;margin:4px 0 10px}
h3{font-size:14px;margin:12px 0 6px}
table{border-collapse:collapse;font-size:13px}
th,td{border-bottom:1px solid #eaeef2;padding:3px 10px 3px 0;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:10px;background:var(--kept);vertical-align:middle;border-radius:2px}
.bar.q{background:#90a4ae}.bar.p{background:#cfd8dc}
.charts{display:flex;flex-wrap:wrap;gap:10px 28px}
.charts .scope{display:flex;gap:10px}
.legend{font-size:12px;margin:0 0 6px}.key{margin-right:14px}
.key i{display:inline-block;width:11px;height:11px;margin-right:4px;vertical-align:-1px;border-radius:2px}
.charts figure{margin:0}
.note{color:var(--mute);font-size:12px;max-width:1000px}
.search{display:flex;gap:6px;align-items:center;margin-top:6px}
.search input{width:340px;padding:4px 6px;font:13px monospace}
#found{font-size:13px;margin-left:8px}
.filters button{font-size:12px;margin:0 4px 4px 0;padding:2px 8px;border:1px solid var(--line);background:#fff;border-radius:12px;cursor:pointer}
.filters button.on{background:#0969da;color:#fff;border-color:#0969da}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:10px}
.card{display:flex;gap:10px;border:1px solid var(--line);border-left:5px solid var(--question);border-radius:5px;padding:8px;background:#fff}
.card.o-kept{border-left-color:var(--kept)}.card.o-answer{border-left-color:var(--answer)}.card.o-unscored{border-left-color:var(--unscored)}
.card.hit{outline:3px solid #0969da}
.card img,.card .noimg{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#eee;flex:none;border-radius:3px}
.card .noimg{display:flex;align-items:center;justify-content:center;color:var(--mute);font-size:11px;text-align:center}
.card .body{min-width:0;flex:1}
.card code{font-size:12px;word-break:break-all}
.badge{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;color:#fff;background:var(--question)}
.o-kept .badge{background:var(--kept)}.o-answer .badge{background:var(--answer)}.o-unscored .badge{background:var(--unscored)}
.tag{font-size:11px;color:var(--mute)}
.scores{font-size:12px;color:var(--mute);margin:2px 0}
.turns{max-height:15em;overflow:auto;margin:4px 0 0;padding-left:18px;font-size:12.5px}
.turns p{margin:1px 0}.turns .q{font-weight:600}
.ts{color:var(--mute);font-size:11px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:10px;border-top:1px solid #eaeef2;padding:8px 0}
.pair .t{font-size:13px;white-space:pre-wrap}
.pair del{background:#ffebe9;text-decoration:line-through;color:#82071e}
.pair ins{background:#dafbe1;text-decoration:none;color:#116329}
.pair .meta{grid-column:1/3;font-size:12px;color:var(--mute)}
.ok{color:var(--kept);font-weight:600}.no{color:#cf222e;font-weight:600}
.demo{border-style:dashed}
"""

JS = r"""
(function(){
var A=window.A2L=window.A2L||{};A.shards={};A.wait={};
A.ids=function(n,rows){A.shards[n]=rows;(A.wait[n]||[]).forEach(function(f){f(rows)});delete A.wait[n];};
function fnv(s){var h=0x811c9dc5,b=new TextEncoder().encode(s);for(var i=0;i<b.length;i++){h=Math.imul((h^b[i])>>>0,0x01000193)>>>0;}return h>>>0;}
function shard(id,cb){var n=fnv(id)%A.meta.shards;if(A.shards[n])return cb(A.shards[n]);
 if(A.wait[n]){A.wait[n].push(cb);return;}A.wait[n]=[cb];var s=document.createElement('script');
 s.src='ids/'+('00'+n).slice(-3)+'.js';s.onerror=function(){say('could not load '+s.src+' (is the report folder complete?)');};
 document.head.appendChild(s);}
function say(t){document.getElementById('found').textContent=t;}
function fmt(x){return x===null?'-':(+x).toFixed(3);}
function describe(id,r){if(!r)return'no record with id "'+id+'" in the pool';
 var t=A.meta.tasks[r[0]],o=A.meta.outcomes[r[1]],c=A.meta.counts[t]||{},s='"'+id+'" ('+t+'): '+A.meta.labels[o];
 if(o==='unscored')return s;
 s+=' | question score '+fmt(r[2])+', rank '+r[3]+' of '+c.scored+' (the top '+c.question+' pass)';
 if(r[5]!==null)s+=' | answer score '+fmt(r[4])+', rank '+r[5]+' of '+c.question+' (the top '+c.kept+' are kept)';
 else s+=' | answer score '+fmt(r[4]);
 if(r[6]>=0)s+=' | restyle: '+r[6]+' rewrite(s) accepted';
 return s;}
A.find=function(id){id=(id||'').trim();if(!id)return;
 document.querySelectorAll('.card.hit').forEach(function(e){e.classList.remove('hit')});
 var card=null;document.querySelectorAll('[data-rid]').forEach(function(e){if(e.getAttribute('data-rid')===id)card=e;});
 if(card){filter(null,null);card.classList.add('hit');card.scrollIntoView({block:'center'});}
 say('looking up '+id+' ...');
 shard(id,function(rows){say(describe(id,rows[id])+(card?'':(rows[id]?' | not in the gallery sample':'')));});
 if(location.hash!=='#id='+encodeURIComponent(id))history.replaceState(null,'','#id='+encodeURIComponent(id));};
var sel={task:null,outcome:null};
function filter(task,outcome){sel.task=task;sel.outcome=outcome;
 document.querySelectorAll('.card[data-rid]').forEach(function(e){
  var on=(!task||e.dataset.task===task)&&(!outcome||e.dataset.outcome===outcome);e.hidden=!on;});
 document.querySelectorAll('.filters button').forEach(function(b){
  var k=b.dataset.k,v=b.dataset.v||null;b.classList.toggle('on',sel[k]===v);});}
document.addEventListener('DOMContentLoaded',function(){
 document.querySelectorAll('.filters button').forEach(function(b){b.addEventListener('click',function(){
  var k=b.dataset.k,v=b.dataset.v||null;if(k==='task')filter(v,sel.outcome);else filter(sel.task,v);});});
 var f=document.getElementById('idform');f.addEventListener('submit',function(ev){ev.preventDefault();A.find(f.q.value);});
 filter(null,null);
 var m=location.hash.match(/^#id=(.*)$/);if(m){f.q.value=decodeURIComponent(m[1]);A.find(f.q.value);}
});
})();
"""
