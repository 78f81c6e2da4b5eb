// Audio worklet of the page's microphone: hands each block of the first channel to the page.
"use strict";

class SusurrusCapture extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) this.port.postMessage(channel.slice(0));
    return true;
  }
}

registerProcessor("susurrus-capture", SusurrusCapture);
