// Train LoRA tab, client side: polls the job status, draws the loss chart, refreshes the Lora cards after a save.
// The server puts {losses: [[step, loss], ...], saved: [names], state} into the hidden #lora_trainer_chart_data
// textbox on each poll. A textbox value set by gradio is no DOM mutation, so one timer watches it, whether or not
// the page defines the WebUI's onUiUpdate.
(function () {
    "use strict";

    const TICK_MS = 250;
    const POLL_MS = 1000;
    const HIDDEN_POLL_MS = 5000; // another WebUI tab (or browser tab) is showing: still notice saves
    const LORA_REFRESH_BUTTONS = ["txt2img_lora_extra_refresh_internal", "img2img_lora_extra_refresh_internal"];
    const WIDTH = 640;
    const HEIGHT = 220;
    const MARGIN = {left: 56, right: 16, top: 14, bottom: 30};
    const SMOOTHING = 0.9;

    let lastPoll = 0;
    let lastData = null;
    let savedNames = null;

    function appRoot() {
        const app = document.querySelector("gradio-app");
        return app && app.shadowRoot ? app.shadowRoot : document;
    }

    function find(selector) {
        return appRoot().querySelector(selector);
    }

    function tick() {
        const tab = find("#lora_trainer_tab");
        if (!tab) {
            return;
        }
        const hidden = document.hidden || tab.offsetParent === null;
        const now = Date.now();
        if (now - lastPoll >= (hidden ? HIDDEN_POLL_MS : POLL_MS)) {
            lastPoll = now;
            const pollButton = find("#lora_trainer_poll");
            if (pollButton) {
                pollButton.click();
            }
        }
        const field = find("#lora_trainer_chart_data textarea, #lora_trainer_chart_data input");
        if (field && field.value !== lastData) {
            lastData = field.value;
            showStatus(lastData);
        }
    }

    function showStatus(text) {
        let data;
        try {
            data = JSON.parse(text);
        } catch (error) {
            return; // empty before the first poll
        }
        drawChart(data.losses || [], data.validation || [], data.best_step);
        // A new file (an older one may have gone with it, keep_last_n_saves): the cards change.
        const saved = data.saved || [];
        if (savedNames !== null && saved.some((name) => !savedNames.includes(name)) && data.refresh_lora_cards) {
            refreshLoraCards();
        }
        savedNames = saved;
    }

    function refreshLoraCards() {
        for (const id of LORA_REFRESH_BUTTONS) {
            const button = find("#" + id);
            if (button) {
                button.click();
            }
        }
    }

    // Exponential moving average with TensorBoard's debiasing, so the first values are not pulled to 0.
    function smoothed(values) {
        let average = 0;
        return values.map((value, index) => {
            average = SMOOTHING * average + (1 - SMOOTHING) * value;
            return average / (1 - Math.pow(SMOOTHING, index + 1));
        });
    }

    function polyline(steps, values, x, y, cssClass) {
        const points = steps.map((step, index) => x(step).toFixed(1) + "," + y(values[index]).toFixed(1));
        return '<polyline class="' + cssClass + '" points="' + points.join(" ") + '"/>';
    }

    function label(text, left, top, anchor) {
        return '<text x="' + left.toFixed(1) + '" y="' + top.toFixed(1) + '" text-anchor="' + anchor + '">' +
            text + "</text>";
    }

    // The training loss (raw and smoothed) and, when the run holds images out, the validation loss with a mark
    // at its lowest point.
    function drawChart(points, validation, bestStep) {
        const box = find("#lora_trainer_chart .lora-trainer-chart");
        if (!box) {
            return;
        }
        box.dataset.points = String(points.length);
        if (points.length === 0) {
            box.innerHTML = '<p class="lora-trainer-chart-empty">The loss curve appears here during training.</p>';
            return;
        }
        const steps = points.map((point) => Number(point[0]));
        const losses = points.map((point) => Number(point[1]));
        const validationSteps = validation.map((point) => Number(point[0]));
        const validationLosses = validation.map((point) => Number(point[1]));
        const firstStep = Math.min(steps[0], ...validationSteps);
        const lastStep = Math.max(steps[steps.length - 1], ...validationSteps, firstStep + 1);
        let low = Math.min(...losses, ...validationLosses);
        let high = Math.max(...losses, ...validationLosses);
        if (high - low < 1e-12) {
            const pad = Math.abs(high) * 0.1 || 0.1;
            low -= pad;
            high += pad;
        }
        const plotWidth = WIDTH - MARGIN.left - MARGIN.right;
        const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
        const x = (step) => MARGIN.left + ((step - firstStep) / (lastStep - firstStep)) * plotWidth;
        const y = (loss) => MARGIN.top + ((high - loss) / (high - low)) * plotHeight;
        const last = points.length - 1;
        const bottom = MARGIN.top + plotHeight;
        let validationMarks = "";
        if (validation.length > 0) {
            const best = validation.find((point) => Number(point[0]) === bestStep) || validation[0];
            validationMarks = polyline(validationSteps, validationLosses, x, y, "lora-trainer-chart-validation") +
                '<circle class="lora-trainer-chart-best" r="4" cx="' + x(Number(best[0])).toFixed(1) + '" cy="' +
                y(Number(best[1])).toFixed(1) + '"><title>lowest validation loss: step ' + best[0] +
                "</title></circle>" +
                label("best step " + best[0], WIDTH - MARGIN.right, MARGIN.top - 4, "end");
        }
        box.innerHTML =
            '<svg viewBox="0 0 ' + WIDTH + " " + HEIGHT + '" role="img" aria-label="training loss">' +
            '<rect class="lora-trainer-chart-frame" x="' + MARGIN.left + '" y="' + MARGIN.top + '" width="' +
            plotWidth + '" height="' + plotHeight + '"/>' +
            polyline(steps, losses, x, y, "lora-trainer-chart-raw") +
            polyline(steps, smoothed(losses), x, y, "lora-trainer-chart-smooth") +
            validationMarks +
            '<circle class="lora-trainer-chart-last" r="3" cx="' + x(steps[last]).toFixed(1) + '" cy="' +
            y(losses[last]).toFixed(1) + '"/>' +
            label(high.toPrecision(3), MARGIN.left - 6, MARGIN.top + 10, "end") +
            label(low.toPrecision(3), MARGIN.left - 6, bottom, "end") +
            label("step " + firstStep, MARGIN.left, bottom + 18, "start") +
            label("step " + steps[last], WIDTH - MARGIN.right, bottom + 18, "end") +
            label("loss " + losses[last].toFixed(4), MARGIN.left + plotWidth / 2, bottom + 18, "middle") +
            "</svg>";
    }

    setInterval(tick, TICK_MS);
})();
