"""WCAG text contrast of what a page shows, from the browser's computed colours, and theme
switching for the browser tests (JupyterLab and Notebook 7 share both)."""

from __future__ import annotations

from typing import Any

LIGHT = "JupyterLab Light"
DARK = "JupyterLab Dark"

# For every visible element under the roots that has text of its own (or is SVG <text>):
# its text colour (CSS `color`, or `fill` for SVG) composited over its effective background
# (the element's and its ancestors' background colours, composited from the first opaque
# one down), and the WCAG 2 contrast ratio of the two. AA asks 4.5, or 3.0 for large text
# (24 px, or 18.66 px bold). Disabled controls are exempt (WCAG 1.4.3), so they are skipped.
CONTRAST_JS = """
(roots) => {
  const parse = (text) => {
    const m = /rgba?\\(([^)]+)\\)/.exec(text || '');
    if (!m) return null;
    const p = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
  };
  const over = (top, under) => {
    const a = top[3];
    return [0, 1, 2].map(i => top[i] * a + under[i] * (1 - a)).concat([1]);
  };
  const lum = (c) => {
    const ch = c.slice(0, 3).map(v => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
    });
    return 0.2126 * ch[0] + 0.7152 * ch[1] + 0.0722 * ch[2];
  };
  const background = (el) => {
    const chain = [];
    for (let e = el; e && e.nodeType === 1; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c && c[3] > 0) {
        chain.push(c);
        if (c[3] >= 1) break;
      }
    }
    let bg = [255, 255, 255, 1];
    for (const c of chain.reverse()) bg = over(c, bg);
    return bg;
  };
  const opacity = (el) => {
    let o = 1;
    for (let e = el; e && e.nodeType === 1; e = e.parentElement) {
      o *= Number(getComputedStyle(e).opacity || 1);
    }
    return o;
  };
  const results = [];
  const seen = new Set();
  for (const selector of roots) {
    for (const root of document.querySelectorAll(selector)) {
      for (const el of [root, ...root.querySelectorAll('*')]) {
        if (seen.has(el)) continue;
        seen.add(el);
        const svgText = el instanceof SVGElement && el.tagName.toLowerCase() === 'text';
        const own = Array.from(el.childNodes)
          .filter(n => n.nodeType === 3)
          .map(n => n.textContent.trim())
          .join(' ')
          .trim();
        if (!own && !(svgText && el.textContent.trim())) continue;
        if (el.closest('button:disabled, [aria-disabled="true"], input:disabled')) continue;
        if (el.closest('svg') && !svgText) continue;
        const rects = el.getClientRects();
        if (!rects.length || rects[0].width === 0 || rects[0].height === 0) continue;
        const style = getComputedStyle(el);
        if (style.visibility === 'hidden' || style.display === 'none') continue;
        const raw = parse(svgText ? style.fill : style.color);
        if (!raw) continue;
        const bg = background(el);
        const fg = over([raw[0], raw[1], raw[2], raw[3] * opacity(el)], bg);
        const [l1, l2] = [lum(fg), lum(bg)].sort((a, b) => b - a);
        const ratio = (l1 + 0.05) / (l2 + 0.05);
        const size = parseFloat(style.fontSize);
        const bold = Number(style.fontWeight) >= 700;
        const large = size >= 24 || (size >= 18.66 && bold);
        results.push({
          text: (own || el.textContent.trim()).slice(0, 60),
          cls: String(el.className && el.className.baseVal !== undefined
            ? el.className.baseVal : el.className).slice(0, 60),
          tag: el.tagName.toLowerCase(),
          ratio: Math.round(ratio * 100) / 100,
          need: large ? 3.0 : 4.5,
          fg: fg.slice(0, 3).map(Math.round).join(','),
          bg: bg.slice(0, 3).map(Math.round).join(','),
        });
      }
    }
  }
  return results;
}
"""


def text_contrast(page: Any, roots: list[str]) -> list[dict[str, Any]]:
    """Every visible text element under the `roots` selectors, with its contrast ratio."""
    return page.evaluate(CONTRAST_JS, roots)


def contrast_failures(page: Any, roots: list[str]) -> tuple[int, list[str]]:
    """How many text elements were checked, and those below WCAG AA, one line each."""
    checked = text_contrast(page, roots)
    failures = [
        f"{r['ratio']} < {r['need']}: <{r['tag']} class={r['cls']!r}> {r['text']!r} "
        f"(text {r['fg']} on {r['bg']})"
        for r in checked
        if r["ratio"] < r["need"]
    ]
    return len(checked), failures


def set_theme(page: Any, theme: str, timeout: float = 30_000) -> None:
    """Switch JupyterLab (or Notebook 7) to `theme` and wait until its CSS is applied."""
    page.evaluate(
        "async (theme) => { await window.jupyterapp.commands.execute("
        "'apputils:change-theme', {theme}); }",
        theme,
    )
    light = "true" if theme == LIGHT else "false"
    page.wait_for_function(
        """(light) => document.body.dataset.jpThemeLight === light &&
          getComputedStyle(document.body).getPropertyValue('--jp-layout-color1').trim() !== ''""",
        arg=light,
        timeout=timeout,
    )
