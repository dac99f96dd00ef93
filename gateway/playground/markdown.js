// A tiny Markdown renderer for model replies: fenced code blocks, inline code, bold,
// italics, bullet and numbered lists, paragraphs. It builds DOM nodes and puts every
// character of the reply into text nodes, so no markup from a model (or a prompt it
// echoes) can ever become HTML: there is no innerHTML anywhere in the playground.
"use strict";

(function () {
  const FENCE = /^\s*```/;
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBERED = /^\s*\d+[.)]\s+(.*)$/;
  // Inline spans, first match wins: `code`, **bold**, __bold__, *italic*, _italic_.
  const INLINE = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]+?)\*\*|__(?=\S)([\s\S]+?)__|\*(?=\S)([^*]+?)\*|\b_(?=\S)([^_]+?)_\b/;

  function element(tag, children) {
    const node = document.createElement(tag);
    for (const child of children) node.append(child);
    return node;
  }

  function inline(text) {
    const out = [];
    let rest = text;
    while (rest) {
      const match = INLINE.exec(rest);
      if (!match) {
        out.push(document.createTextNode(rest));
        break;
      }
      if (match.index > 0) out.push(document.createTextNode(rest.slice(0, match.index)));
      if (match[1]) out.push(element("code", [document.createTextNode(match[2])]));
      else if (match[3] !== undefined || match[4] !== undefined) {
        out.push(element("strong", inline(match[3] ?? match[4])));
      } else out.push(element("em", inline(match[5] ?? match[6])));
      rest = rest.slice(match.index + match[0].length);
    }
    return out;
  }

  function lines(text, start) {
    // Lines of a paragraph or list item keep their breaks, as a chat reply means them.
    const out = [];
    text.forEach((line, i) => {
      if (i > 0) out.push(document.createElement("br"));
      out.push(...inline(line.trim()));
    });
    return out;
  }

  function renderMarkdown(source) {
    const fragment = document.createDocumentFragment();
    const all = String(source).replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < all.length) {
      const line = all[i];
      if (FENCE.test(line)) {
        const language = line.replace(FENCE, "").trim();
        const body = [];
        i += 1;
        while (i < all.length && !FENCE.test(all[i])) body.push(all[i++]);
        i += 1; // the closing fence, if it has arrived yet
        const code = element("code", [document.createTextNode(body.join("\n"))]);
        if (/^[\w+-]+$/.test(language)) code.dataset.language = language;
        fragment.append(element("pre", [code]));
      } else if (BULLET.test(line) || NUMBERED.test(line)) {
        const pattern = BULLET.test(line) ? BULLET : NUMBERED;
        const list = document.createElement(pattern === BULLET ? "ul" : "ol");
        while (i < all.length && pattern.test(all[i])) {
          list.append(element("li", inline(pattern.exec(all[i])[1])));
          i += 1;
        }
        fragment.append(list);
      } else if (!line.trim()) {
        i += 1;
      } else {
        const paragraph = [];
        while (
          i < all.length && all[i].trim() && !FENCE.test(all[i]) &&
          !BULLET.test(all[i]) && !NUMBERED.test(all[i])
        ) paragraph.push(all[i++]);
        fragment.append(element("p", lines(paragraph)));
      }
    }
    return fragment;
  }

  window.renderMarkdown = renderMarkdown;
})();
