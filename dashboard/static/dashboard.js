// Fusion dashboard: draws each chart from the JSON spec beside it with the vendored vega-embed, and submits a
// picker form when one of its selects changes. No inline script anywhere: the Content-Security-Policy allows
// only this app's own files, and `ast: true` keeps Vega from generating code (no 'unsafe-eval').
"use strict";

function drawChart(element) {
  const source = document.getElementById(element.dataset.chart);
  element.dataset.state = "drawing";
  let spec;
  try {
    spec = JSON.parse(source.textContent);
  } catch (error) {
    element.dataset.state = "failed";
    element.textContent = "The chart's data could not be read: " + error.message;
    return;
  }
  vegaEmbed(element, spec, {
    renderer: "canvas",
    actions: false,
    ast: true,
    defaultStyle: false,
    tooltip: { disableDefaultStyle: true },
  }).then(() => {
    element.dataset.state = "drawn";
  }).catch((error) => {
    element.dataset.state = "failed";
    element.textContent = "The chart could not be drawn: " + error.message;
  });
}

function submitOnChange(form) {
  form.querySelectorAll("select").forEach((select) => {
    select.addEventListener("change", () => {
      // A new metric has its own regions; a new range drops the explicit from/before.
      if (select.name === "metric") {
        const region = form.querySelector("select[name=region]");
        if (region) region.value = "";
      }
      if (select.name === "days" && select.value !== "") {
        form.querySelectorAll("input[name=start], input[name=end]").forEach((input) => { input.value = ""; });
      }
      form.requestSubmit();
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-chart]").forEach(drawChart);
  document.querySelectorAll("form.pickers").forEach(submitOnChange);
});
