// The HTML report in a real browser: headless Chromium loads the page from disk without errors,
// finds the summary, inventory and link heat map, and renders a non-trivial screenshot.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "tests/check/check_process.h"

namespace ferry::testing {
namespace {

namespace fs = std::filesystem;

std::string find_chromium() {
  for (const char* name : {"chromium", "chromium-browser", "google-chrome"}) {
    for (const char* dir : {"/usr/bin/", "/usr/local/bin/", "/snap/bin/"}) {
      const std::string path = std::string(dir) + name;
      if (::access(path.c_str(), X_OK) == 0) return path;
    }
  }
  return "";
}

// Width and height from the PNG's IHDR chunk; {0, 0} when the file is not a PNG.
std::pair<uint32_t, uint32_t> png_size(const std::string& bytes) {
  static const unsigned char kMagic[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (bytes.size() < 24 || bytes.compare(0, 8, reinterpret_cast<const char*>(kMagic), 8) != 0) return {0, 0};
  auto be32 = [&](size_t at) {
    return uint32_t(uint8_t(bytes[at])) << 24 | uint32_t(uint8_t(bytes[at + 1])) << 16 |
           uint32_t(uint8_t(bytes[at + 2])) << 8 | uint32_t(uint8_t(bytes[at + 3]));
  };
  return {be32(16), be32(20)};
}

class CheckHtml : public ::testing::Test {
 protected:
  void SetUp() override {
    chromium_ = find_chromium();
    if (chromium_.empty()) GTEST_SKIP() << "chromium is not installed (scripts/install_deps.sh installs it)";
    dir_ = make_temp_dir("html");
    html_ = dir_ + "/report.html";
    const ProcessResult r = run_process(
        {ferry_check_binary(), "--local-ranks", "3", "--provider", "tcp", "--nics", "lo", "--timeout-ms", "15000",
         "--latency-iters", "10", "--bw-bytes", "65536", "--bw-iters", "2", "--bw-reps", "1", "--loopback-bytes",
         "65536", "--a2a-tokens", "8", "--a2a-decode-hidden", "256", "--a2a-wide-hidden", "512", "--a2a-iters", "1",
         "--outlier-ratio", "0", "--html", html_},
        55000);
    ASSERT_FALSE(r.timed_out) << r.output;
    ASSERT_TRUE(fs::exists(html_)) << r.output;
  }

  // Chromium writes into its profile; a private one per test keeps runs independent.
  std::vector<std::string> chromium_args(std::vector<std::string> extra) const {
    std::vector<std::string> argv = {chromium_, "--headless", "--no-sandbox", "--disable-gpu",
                                     "--no-first-run", "--disable-dev-shm-usage", "--user-data-dir=" + dir_ + "/profile"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return argv;
  }

  std::string chromium_, dir_, html_;
};

TEST_F(CheckHtml, PageUsesNoExternalResources) {
  const std::string html = read_text(html_);
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("<link"), std::string::npos);
  EXPECT_EQ(html.find("src="), std::string::npos);
  EXPECT_EQ(html.find("url("), std::string::npos);
  EXPECT_NE(html.find("<style>"), std::string::npos);
}

TEST_F(CheckHtml, BrowserLoadsThePageAndFindsItsTables) {
  const ProcessResult r = run_process(
      chromium_args({"--enable-logging=stderr", "--v=0", "--dump-dom", "file://" + html_}), 90000);
  ASSERT_FALSE(r.timed_out) << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* id : {"id=\"result\"", "id=\"summary-table\"", "id=\"inventory-table\"", "id=\"bandwidth-slot-0\"",
                         "id=\"latency-slot-0\"", "id=\"alltoall-table\""})
    EXPECT_NE(r.output.find(id), std::string::npos) << id << " missing from the rendered DOM";
  // The page itself must produce no console errors (the browser's own GPU/dbus noise is not the page's).
  EXPECT_EQ(r.output.find("CONSOLE"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("Uncaught"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("Failed to load resource"), std::string::npos) << r.output;
}

TEST_F(CheckHtml, ScreenshotIsANonTrivialPng) {
  const std::string png = dir_ + "/report.png";
  const ProcessResult r =
      run_process(chromium_args({"--screenshot=" + png, "--window-size=1400,1800", "--hide-scrollbars", "file://" + html_}),
                  90000);
  ASSERT_FALSE(r.timed_out) << r.output;
  ASSERT_TRUE(fs::exists(png)) << r.output;
  const std::string bytes = read_text(png);
  const auto [w, h] = png_size(bytes);
  EXPECT_EQ(w, 1400u);
  EXPECT_EQ(h, 1800u);
  // A blank page of this size compresses to a few KiB; tables, colours and text do not.
  EXPECT_GT(bytes.size(), 30000u) << "screenshot looks empty";
}

}  // namespace
}  // namespace ferry::testing
