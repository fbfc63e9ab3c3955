// Model output as Markdown, safely: raw HTML in the text is shown as text, images become
// their alt text, and what marked writes goes through DOMPurify. The page's
// Content-Security-Policy (no inline script, nothing from elsewhere) is the last line.
"use strict";
(() => {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

  const parser = new window.marked.Marked({
    gfm: true,
    breaks: true,
    renderer: {
      html: (token) => escapeHtml(token.text ?? token.raw ?? ""),
      image: (token) => escapeHtml(token.text || token.href || ""),
    },
  });

  const POLICY = {
    RETURN_DOM_FRAGMENT: true,
    FORBID_TAGS: ["img", "style", "form", "input", "button", "svg", "math", "iframe", "video", "audio", "source", "picture", "link", "meta", "base"],
    FORBID_ATTR: ["style", "srcset", "src", "action", "formaction", "background", "poster"],
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
  };

  /** A DocumentFragment of `text` rendered as sanitised Markdown. */
  window.renderMarkdown = (text) => {
    const fragment = window.DOMPurify.sanitize(parser.parse(text), POLICY);
    for (const link of fragment.querySelectorAll("a")) {
      link.target = "_blank";
      link.rel = "noopener noreferrer nofollow";
    }
    return fragment;
  };
})();
