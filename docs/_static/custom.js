// Small reading aids for the optax_guard site.

document.addEventListener("DOMContentLoaded", () => {
  // The API reference used to be one page (api.html#optax_guard.zclip). When
  // an address names an object that is not on the page but a link on the page
  // points to it (the index's tables link every name to its family page), go
  // there, so that old links keep working.
  const id = decodeURIComponent(window.location.hash.slice(1));
  if (id.startsWith("optax_guard.") && !document.getElementById(id)) {
    const link = Array.from(document.links).find(
      (a) => a.hash === "#" + id && a.pathname !== window.location.pathname,
    );
    if (link) {
      window.location.replace(link.href);
      return;
    }
  }

  // Long object names in the page contents sidebar (scale_by_stable_adam())
  // may break after an underscore, and nowhere else (the stylesheet forbids
  // breaks inside a word): a class name such as ScaleByStableAdamState stays
  // whole.
  const zwsp = "\u200b";
  document.querySelectorAll(".bd-sidebar-secondary code span.pre").forEach((span) => {
    span.textContent = span.textContent.replace(/_(?=.)/g, "_" + zwsp);
  });
});
