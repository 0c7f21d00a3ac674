namespace ferry::ep {
const char* version() { return "0.1.0"; }
}  // namespace ferry::ep
