"""A one-page playground (CLIPSERVE_PLAYGROUND=true): pick an image, type labels, see the ranking."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clipserve playground</title>
<style>body{font:15px system-ui;margin:2em auto;max-width:42em}input,textarea,button{font:inherit;width:100%;
margin:.3em 0}table{border-collapse:collapse;width:100%}td{padding:.2em .5em;border-bottom:1px solid #ddd}</style>
</head><body><h1>clipserve</h1>
<form id="f"><input type="file" name="image" accept="image/*" required>
<textarea name="labels" rows="3" required>a red circle, a blue square, a green triangle</textarea>
<input name="templates" value="simple"><button>Classify</button></form>
<table id="out"></table>
<script>
document.getElementById("f").onsubmit = async (event) => {
  event.preventDefault();
  const response = await fetch("/classify", {method: "POST", body: new FormData(event.target)});
  const body = await response.json(), table = document.getElementById("out");
  table.replaceChildren();
  const rows = response.ok ? body.results[0].labels.map(l => [l.label, (100 * l.probability).toFixed(1) + " %"])
                           : [[body.error.code, body.error.message]];
  for (const cells of rows) {
    const tr = table.insertRow();
    for (const text of cells) tr.insertCell().textContent = text;
  }
};
</script></body></html>
"""
