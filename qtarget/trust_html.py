"""The trust report as one self-contained HTML file: the data as JSON, the script, the styles
and the summary plots (SVG) inline; no server, no network.

:func:`render` takes plain per-example rows (see :func:`example_row`) and the detector's
metrics, and returns the page's text.
"""

import html
import json

import numpy as np


def example_row(index: int, prompt: str, token_texts: list[str], scores, prior_top_texts,
                corrupted: bool | None, wrong_token: np.ndarray | None) -> dict:
  """One demonstration as the page reads it (numbers to 4 significant digits: a trust of 1e-7
  stays visible)."""
  significant = lambda v: float(f'{float(v):.4g}')
  round4 = lambda values: [significant(v) for v in values]
  trust = np.asarray(scores.trust, np.float64)
  return {
      'id': index, 'prompt': prompt, 'tokens': token_texts, 'trust': round4(trust),
      'prior_prob': round4(scores.prior_prob), 'prior_top': list(prior_top_texts),
      'tv': round4(scores.total_variation), 'kl': round4(scores.kl),
      'min_trust': significant(trust.min()), 'mean_trust': significant(trust.mean()),
      'max_tv': significant(np.max(scores.total_variation)),
      'mean_nll': significant(-np.log(np.maximum(trust, 1e-30)).mean()),
      'corrupted': corrupted,
      'wrong': None if wrong_token is None else [bool(w) for w in wrong_token],
  }


def _histogram_svg(values, title: str, bins: int = 20, width: int = 360, height: int = 160,
                   log: bool = False) -> str:
  """Counts over [0, 1], or with ``log`` over log10 of the values in [1e-8, 1]."""
  values = np.asarray(values, np.float64)
  low, labels = (-8.0, ('1e-8', '1')) if log else (0.0, ('0', '1'))
  if log:
    values = np.log10(np.maximum(values, 1e-8))
  counts, edges = np.histogram(values, bins=bins, range=(low, 0.0 if log else 1.0))
  top = max(int(counts.max()), 1)
  bar = (width - 40) / bins
  bars = ''.join(
      f'<rect x="{30 + i * bar:.1f}" y="{height - 25 - (height - 45) * c / top:.1f}" '
      f'width="{bar - 1:.1f}" height="{(height - 45) * c / top:.1f}" class="bar">'
      f'<title>[{edges[i]:.2f}, {edges[i + 1]:.2f}): {c}</title></rect>'
      for i, c in enumerate(counts))
  return (f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
          f'<text x="{width / 2}" y="14" text-anchor="middle">{html.escape(title)}</text>'
          f'{bars}<line x1="30" y1="{height - 25}" x2="{width - 10}" y2="{height - 25}" '
          f'class="axis"/><text x="30" y="{height - 8}">{labels[0]}</text>'
          f'<text x="{width - 10}" y="{height - 8}" text-anchor="end">{labels[1]}</text>'
          f'<text x="4" y="{height - 25}">0</text><text x="4" y="28">{top}</text></svg>')


def _roc_svg(curves: dict, title: str, size: int = 200) -> str:
  colors = ['#1f77b4', '#d62728', '#2ca02c']
  paths = []
  for (name, (fpr, tpr, area)), color in zip(curves.items(), colors):
    points = ' '.join(f'{20 + (size - 30) * x:.1f},{size - 20 - (size - 30) * y:.1f}'
                      for x, y in zip(fpr, tpr))
    paths.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2">'
                 f'<title>{html.escape(name)}: AUROC {area:.3f}</title></polyline>')
  legend = ''.join(f'<text x="{size + 5}" y="{40 + 16 * i}" fill="{color}">'
                   f'{html.escape(name)} ({area:.3f})</text>'
                   for i, ((name, (_, _, area)), color) in enumerate(zip(curves.items(), colors)))
  return (f'<svg width="{size + 190}" height="{size}" role="img" aria-label="{title}">'
          f'<text x="0" y="8">{html.escape(title)}</text>'
          f'<rect x="20" y="10" width="{size - 30}" height="{size - 30}" class="frame"/>'
          f'<line x1="20" y1="{size - 20}" x2="{size - 10}" y2="10" class="diagonal"/>'
          f'{"".join(paths)}{legend}<text x="20" y="{size - 5}">false positive rate</text></svg>')


_STYLE = '''
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } .plots { display: flex; flex-wrap: wrap; gap: 1.5em; }
svg text { font-size: 11px; } .bar { fill: #4c78a8; } .axis, .frame { stroke: #888; fill: none; }
.diagonal { stroke: #bbb; stroke-dasharray: 4 3; }
.controls { margin: 1em 0; display: flex; flex-wrap: wrap; gap: 1em; align-items: center; }
table { border-collapse: collapse; width: 100%; } th { cursor: pointer; text-align: left;
background: #f3f3f3; position: sticky; top: 0; } th, td { border-bottom: 1px solid #ddd;
padding: 4px 6px; vertical-align: top; } td.demo { font-family: ui-monospace, monospace;
white-space: pre-wrap; } .tok { border-radius: 2px; }
.tok.wrong { box-shadow: inset 0 -3px 0 #000; }
.prompt { color: #555; font-size: 0.9em; } .flag { color: #b00; font-weight: bold; }
'''

_SCRIPT = '''
const DATA = JSON.parse(document.getElementById('data').textContent);
const state = {key: 'min_trust', descending: false, query: '', below: 1.0, only: 'all', page: 0};
const PAGE = 100;
function colour(t) {  // low trust red, high trust white
  const v = Math.round(255 * Math.max(0, Math.min(1, t)));
  return `rgb(255, ${v}, ${v})`;
}
function escapeText(s) {
  return s.replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
}
function tokensHtml(e) {
  return e.tokens.map((text, i) => {
    const tip = `p_y ${e.trust[i]} | prior: top ${JSON.stringify(e.prior_top[i])}, `
      + `p(y) ${e.prior_prob[i]} | TV ${e.tv[i]} | KL ${e.kl[i]}`;
    const wrong = e.wrong && e.wrong[i] ? ' wrong' : '';
    return `<span class="tok${wrong}" style="background:${colour(e.trust[i])}" `
      + `title="${escapeText(tip)}">${escapeText(text)}</span>`;
  }).join('');
}
function visible() {
  const q = state.query.toLowerCase();
  let rows = DATA.examples.filter(e => e.min_trust <= state.below
    && (state.only === 'all' || (state.only === 'corrupted') === Boolean(e.corrupted))
    && (!q || e.prompt.toLowerCase().includes(q) || e.tokens.join('').toLowerCase().includes(q)));
  const sign = state.descending ? -1 : 1;
  rows.sort((a, b) => sign * (a[state.key] - b[state.key]) || a.id - b.id);
  return rows;
}
function draw() {
  const rows = visible();
  const pages = Math.max(1, Math.ceil(rows.length / PAGE));
  state.page = Math.min(state.page, pages - 1);
  const shown = rows.slice(state.page * PAGE, (state.page + 1) * PAGE);
  document.getElementById('count').textContent =
    `${rows.length} of ${DATA.examples.length} demonstrations; page ${state.page + 1} of ${pages}`;
  document.getElementById('rows').innerHTML = shown.map(e => `<tr data-id="${e.id}">`
    + `<td>${e.id}${e.corrupted ? ' <span class="flag">corrupted</span>' : ''}</td>`
    + `<td>${e.min_trust}</td><td>${e.mean_trust}</td><td>${e.max_tv}</td>`
    + `<td>${e.mean_nll}</td><td class="demo"><div class="prompt">${escapeText(e.prompt)}</div>`
    + `${tokensHtml(e)}</td></tr>`).join('');
}
document.querySelectorAll('th[data-key]').forEach(th => th.addEventListener('click', () => {
  const key = th.dataset.key;
  state.descending = state.key === key ? !state.descending : false;
  state.key = key; state.page = 0; draw();
}));
document.getElementById('search').addEventListener('input', e => {
  state.query = e.target.value; state.page = 0; draw(); });
document.getElementById('below').addEventListener('input', e => {
  state.below = parseFloat(e.target.value);
  document.getElementById('below-value').textContent = e.target.value; state.page = 0; draw(); });
document.getElementById('only').addEventListener('change', e => {
  state.only = e.target.value; state.page = 0; draw(); });
document.getElementById('previous').addEventListener('click', () => {
  state.page = Math.max(0, state.page - 1); draw(); });
document.getElementById('next').addEventListener('click', () => { state.page += 1; draw(); });
draw();
'''


def render(title: str, description: str, rows: list[dict], metrics: dict | None,
           roc: dict | None = None) -> str:
  """The page. ``roc``: ranker name -> (fpr, tpr, auroc), drawn when the data carries
  corruption labels; ``metrics``: :func:`qtarget.trust_scores.detector_metrics` or None."""
  token_trust = [t for row in rows for t in row['trust']]
  plots = [_histogram_svg(token_trust, 'trust p_y over tokens'),
           _histogram_svg([row['min_trust'] for row in rows],
                          'lowest trust over demonstrations (log scale)', log=True)]
  if roc:
    plots.append(_roc_svg(roc, 'finding corrupted demonstrations (ROC)'))
  table = ''
  if metrics:
    lines = [f'<tr><td>{html.escape(name)}</td><td>{m["auroc"]:.3f} '
             f'[{m["auroc_interval"][0]:.3f}, {m["auroc_interval"][1]:.3f}]</td>'
             f'<td>{m["precision"]:.3f} [{m["precision_interval"][0]:.3f}, '
             f'{m["precision_interval"][1]:.3f}]</td></tr>'
             for name, m in metrics['rankers'].items()]
    table = ('<table id="detector"><tr><th>ranking by</th><th>AUROC [95% bootstrap]</th>'
             f'<th>precision at the corruption rate ({metrics["rate"]:.2f})</th></tr>'
             + ''.join(lines) + '</table>')
  data = json.dumps({'examples': rows}, separators=(',', ':')).replace('</', '<\\/')
  return f'''<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1><p>{html.escape(description)}</p>
<div class="plots">{"".join(plots)}</div>{table}
<div class="controls">
<label>search <input id="search" type="search" placeholder="prompt or demonstration text"></label>
<label>lowest trust at most <input id="below" type="range" min="0" max="1" step="0.01"
 value="1"> <span id="below-value">1</span></label>
<label>show <select id="only"><option value="all">all</option>
<option value="corrupted">corrupted</option><option value="clean">not corrupted</option>
</select></label>
<button id="previous">previous</button><button id="next">next</button>
<span id="count"></span></div>
<table><thead><tr><th data-key="id">#</th><th data-key="min_trust">lowest trust</th>
<th data-key="mean_trust">mean trust</th><th data-key="max_tv">largest TV to prior</th>
<th data-key="mean_nll">mean NLL</th><th>demonstration (colour: trust p_y; hover: the prior;
underlined: the corrupted step)</th>
</tr></thead><tbody id="rows"></tbody></table>
<script type="application/json" id="data">{data}</script>
<script>{_SCRIPT}</script>
</body></html>
'''
