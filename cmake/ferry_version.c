/* libferry.so is the whole-archive union of the layer libraries; this file gives it a source. */
const char ferry_version_string[] = "ferry 0.1.0";
