// The spike experiment's demo service (bench/spike/app.py) as a C++ server:
// Asio coroutines for HTTP/1.1, async_acquire() for the limits, a pool of
// worker threads for the blocking work, so the I/O thread never blocks.
//
//   GET /messages   100 random messages of a random user: the SQLite query of
//                   bench/spike/data.py on a fresh read-only connection, in a
//                   worker thread. Limited by Resource(5) "db".
//   GET /file       the 5 KB file read in 1 KB chunks, in a worker thread.
//                   Limited by Resource(10) "file".
//   GET /health     {"status": "ok", "variant": ..., "package": ..., "pid": ...};
//                   never limited.
//   GET /stats      queries running now and at most, the limiter's counters.
//
// A request that gets no slot within 2 s (--timeout) is answered 503 with
// FastAPI's bytes for {"detail": "Server busy, please retry later"} and
// Retry-After: 1, as the Python service does.
//
//   demo_server --db .cache/spike/messages-v1.sqlite3 --file .cache/spike/file-v1.txt
//               [--host 127.0.0.1] [--port 8000] [--workers 40] [--timeout 2]
//               [--no-limit] [--variant NAME]
//
// The database and the file come from `python bench/spike/data.py`. From
// the environment, when the flags are absent: SPIKE_DB, SPIKE_FILE,
// SPIKE_NO_LIMIT=1 (--no-limit), SPIKE_VARIANT (the name /health reports),
// SPIKE_PROBE_DIR (the experiment's shared gauges: queries in flight).
// --no-limit serves the same endpoints without the limiter: every request
// goes straight to the worker pool (40 threads, as the Python service's
// default thread pool). --port 0 picks a free port; the server prints
// "listening on http://HOST:PORT" once it accepts connections.
// SIGTERM or SIGINT: stop accepting, finish the requests in flight (for up
// to 5 s), exit.
#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <unistd.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read_until.hpp>
#include <asio/signal_set.hpp>
#include <asio/steady_timer.hpp>
#include <asio/thread_pool.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>
#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>

#include "concurrency_limiter/asio.h"
#include "concurrency_limiter/concurrency_limiter.h"

namespace cl = concurrency_limiter;
using asio::ip::tcp;
using namespace std::chrono_literals;

namespace {

// bench/spike/data.py
constexpr std::string_view kMessagesQuery =
    "SELECT message_id, user_id, message, created_at FROM messages "
    "WHERE date(created_at) >= ? AND user_id = ? "
    "ORDER BY random() LIMIT ?";
constexpr std::string_view kMessagesSince = "2020-01-01";
constexpr int kUserCount = 1000;
constexpr int kRowsPerQuery = 100;
constexpr std::size_t kFileChunkSize = 1024;

// What FastAPI sends for HTTPException(503, "Server busy, please retry later").
constexpr std::string_view kBusyBody = R"({"detail":"Server busy, please retry later"})";
constexpr std::size_t kMaxHeaderBytes = 8192;

constexpr auto as_tuple_awaitable = asio::experimental::as_tuple(asio::use_awaitable);

struct Options {
  std::string host = "127.0.0.1";
  unsigned short port = 8000;
  std::string db;
  std::string file;
  int workers = 40;
  bool limit = true;
  std::chrono::milliseconds timeout = 2s;
  std::string variant;  // what /health reports; default "cpp" or "cpp-none"
};

void append_json_string(std::string& out, std::string_view s) {
  out += '"';
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

// The spike experiment's shared gauge file (bench/spike/probe.py): two
// native int64 (value, peak since the sampler's last read), updated under an
// exclusive flock so that every process of a variant adds to the same count.
// Does nothing without $SPIKE_PROBE_DIR.
class SharedGauge {
 public:
  explicit SharedGauge(const char* name) {
    const char* dir = std::getenv("SPIKE_PROBE_DIR");
    if (!dir || !*dir) return;
    const std::string path = std::string(dir) + "/" + name + ".gauge";
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd_ < 0) std::cerr << "warning: cannot open gauge " << path << "\n";
  }
  SharedGauge(const SharedGauge&) = delete;
  SharedGauge& operator=(const SharedGauge&) = delete;
  ~SharedGauge() {
    if (fd_ >= 0) ::close(fd_);
  }

  void add(std::int64_t delta) {
    if (fd_ < 0) return;
    std::lock_guard lock(mu_);  // flock does not exclude threads sharing fd_
    if (::flock(fd_, LOCK_EX) != 0) return;
    std::int64_t v[2] = {0, 0};
    if (::pread(fd_, v, sizeof v, 0) != static_cast<ssize_t>(sizeof v)) v[0] = v[1] = 0;
    v[0] += delta;
    v[1] = std::max(v[1], v[0]);
    (void)!::pwrite(fd_, v, sizeof v, 0);
    ::flock(fd_, LOCK_UN);
  }

 private:
  int fd_ = -1;
  std::mutex mu_;
};

// Counts the queries running at once, to show that the limit holds: in
// this process (/stats) and in the experiment's shared gauge.
struct QueryGauge {
  std::atomic<int> running{0};
  std::atomic<int> peak{0};
  std::atomic<long> total{0};
  SharedGauge shared{"db_in_flight"};

  void enter() {
    const int now = running.fetch_add(1, std::memory_order_relaxed) + 1;
    int p = peak.load(std::memory_order_relaxed);
    while (now > p && !peak.compare_exchange_weak(p, now, std::memory_order_relaxed)) {}
    total.fetch_add(1, std::memory_order_relaxed);
    shared.add(1);
  }
  void leave() {
    shared.add(-1);
    running.fetch_sub(1, std::memory_order_relaxed);
  }
};

// The /messages query on a fresh read-only connection, as JSON. Blocking:
// runs in a worker thread.
std::string query_messages(const std::string& path, int user_id, QueryGauge& gauge) {
  struct Running {
    QueryGauge& g;
    explicit Running(QueryGauge& gauge) : g(gauge) { g.enter(); }
    ~Running() { g.leave(); }
  } running(gauge);
  sqlite3* db = nullptr;
  struct Close {
    sqlite3*& db;
    ~Close() { sqlite3_close_v2(db); }
  } close{db};
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX,
                      nullptr) != SQLITE_OK) {
    throw std::runtime_error(std::string("cannot open database: ") + sqlite3_errmsg(db));
  }
  sqlite3_stmt* stmt = nullptr;
  if (sqlite3_prepare_v2(db, kMessagesQuery.data(), static_cast<int>(kMessagesQuery.size()),
                         &stmt, nullptr) != SQLITE_OK) {
    throw std::runtime_error(std::string("cannot prepare query: ") + sqlite3_errmsg(db));
  }
  struct Finalize {
    sqlite3_stmt* s;
    ~Finalize() { sqlite3_finalize(s); }
  } finalize{stmt};
  sqlite3_bind_text(stmt, 1, kMessagesSince.data(), static_cast<int>(kMessagesSince.size()),
                    SQLITE_STATIC);
  sqlite3_bind_int(stmt, 2, user_id);
  sqlite3_bind_int(stmt, 3, kRowsPerQuery);
  std::string out = "[";
  int rc;
  while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
    if (out.size() > 1) out += ',';
    out += "{\"message_id\":" + std::to_string(sqlite3_column_int64(stmt, 0));
    out += ",\"user_id\":" + std::to_string(sqlite3_column_int64(stmt, 1));
    out += ",\"message\":";
    append_json_string(out, reinterpret_cast<const char*>(sqlite3_column_text(stmt, 2)));
    out += ",\"created_at\":";
    append_json_string(out, reinterpret_cast<const char*>(sqlite3_column_text(stmt, 3)));
    out += '}';
  }
  if (rc != SQLITE_DONE) {
    throw std::runtime_error(std::string("query failed: ") + sqlite3_errmsg(db));
  }
  out += ']';
  return out;
}

// The whole file, read in 1 KB chunks. Blocking: runs in a worker thread.
std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::string out;
  char chunk[kFileChunkSize];
  while (in.read(chunk, sizeof chunk) || in.gcount() > 0) {
    out.append(chunk, static_cast<std::size_t>(in.gcount()));
  }
  return out;
}

struct Response {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  bool retry_after = false;
  bool client_gone = false;  // nothing to send: the client closed the connection
};

// A designated initializer that leaves members out, as Response{.status = 404},
// trips GCC 12's -Wmissing-field-initializers (-Wextra): built with this.
Response reply(int status, std::string body) {
  Response r;
  r.status = status;
  r.body = std::move(body);
  return r;
}

std::string_view reason_phrase(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
  }
  return "Unknown";
}

std::string serialize(const Response& r, bool keep_alive) {
  std::string out = "HTTP/1.1 " + std::to_string(r.status) + " ";
  out += reason_phrase(r.status);
  out += "\r\nserver: concurrency-limiter-demo\r\ncontent-type: " + r.content_type;
  out += "\r\ncontent-length: " + std::to_string(r.body.size());
  if (r.retry_after) out += "\r\nretry-after: 1";
  if (!keep_alive) out += "\r\nconnection: close";
  out += "\r\n\r\n";
  out += r.body;
  return out;
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) !=
        std::tolower(static_cast<unsigned char>(b[i]))) {
      return false;
    }
  }
  return true;
}

struct Request {
  std::string method;
  std::string path;
  bool keep_alive = true;
  std::size_t content_length = 0;
};

// Parses the request line and the headers this server needs.
bool parse_head(std::string_view head, Request& req) {
  auto line_end = head.find("\r\n");
  std::string_view line = head.substr(0, line_end);
  const auto sp1 = line.find(' ');
  const auto sp2 = line.rfind(' ');
  if (sp1 == std::string_view::npos || sp2 == sp1) return false;
  req.method = std::string(line.substr(0, sp1));
  std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  req.path = std::string(target.substr(0, target.find('?')));
  const std::string_view version = line.substr(sp2 + 1);
  req.keep_alive = version == "HTTP/1.1";
  while (line_end != std::string_view::npos) {
    const auto start = line_end + 2;
    line_end = head.find("\r\n", start);
    line = head.substr(start, line_end == std::string_view::npos ? head.npos : line_end - start);
    const auto colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    const std::string_view name = line.substr(0, colon);
    std::string_view value = line.substr(colon + 1);
    while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
    while (!value.empty() && (value.back() == ' ' || value.back() == '\t')) value.remove_suffix(1);
    if (iequals(name, "connection")) {
      if (iequals(value, "close")) req.keep_alive = false;
      if (iequals(value, "keep-alive")) req.keep_alive = true;
    } else if (iequals(name, "content-length")) {
      std::from_chars(value.data(), value.data() + value.size(), req.content_length);
    } else if (iequals(name, "transfer-encoding")) {
      return false;  // no endpoint takes a body
    }
  }
  return true;
}

class Server {
 public:
  Server(asio::io_context& io, Options options)
      : io_(io),
        options_(std::move(options)),
        pool_(static_cast<std::size_t>(options_.workers)),
        acceptor_(io),
        db_(cl::Resource::create("db", 5)),
        file_(cl::Resource::create("file", 10)),
        limiter_({db_, file_}, options_.timeout),
        needs_db_(limiter_.select({db_})),
        needs_file_(limiter_.select({file_})) {
    auto address = asio::ip::make_address(options_.host);
    tcp::endpoint endpoint(address, options_.port);
    acceptor_.open(endpoint.protocol());
    acceptor_.set_option(tcp::acceptor::reuse_address(true));
    acceptor_.bind(endpoint);
    acceptor_.listen(asio::socket_base::max_listen_connections);
  }

  unsigned short port() const { return acceptor_.local_endpoint().port(); }

  asio::awaitable<void> accept_loop() {
    for (;;) {
      auto [ec, socket] = co_await acceptor_.async_accept(as_tuple_awaitable);
      if (ec) {
        if (!acceptor_.is_open()) co_return;  // stopping
        continue;  // e.g. EMFILE: keep serving the connections we have
      }
      socket.set_option(tcp::no_delay(true));
      asio::co_spawn(io_, session(std::move(socket)), asio::detached);
    }
  }

  // Stop accepting, close idle connections; requests in flight finish and
  // then close theirs. run() returns when the last one is done, or after
  // `grace` at the latest (a backlog of queries for clients long gone is
  // not worth waiting for).
  void stop(std::chrono::seconds grace) {
    stopping_ = true;
    asio::error_code ignored;
    acceptor_.close(ignored);
    for (tcp::socket* s : idle_) s->cancel(ignored);
    if (sessions_ == 0) return;
    deadline_.expires_after(grace);
    deadline_.async_wait([this](const asio::error_code& ec) {
      if (!ec) io_.stop();
    });
  }

  // Queries already running finish; queued ones are dropped.
  void stop_workers() {
    pool_.stop();
    pool_.join();
  }

 private:
  asio::awaitable<void> session(tcp::socket socket) {
    ++sessions_;
    std::string buffer;
    for (;;) {
      idle_.insert(&socket);
      if (stopping_) {
        idle_.erase(&socket);
        break;
      }
      auto [ec, n] = co_await asio::async_read_until(
          socket, asio::dynamic_buffer(buffer, kMaxHeaderBytes), "\r\n\r\n", as_tuple_awaitable);
      idle_.erase(&socket);
      if (ec) {
        if (ec == asio::error::not_found) {  // headers beyond the limit
          const Response too_large =
              reply(431, R"({"detail":"Request Header Fields Too Large"})");
          co_await write(socket, too_large, false);
        }
        break;
      }
      Request req;
      if (!parse_head(std::string_view(buffer).substr(0, n), req)) {
        const Response bad = reply(400, R"({"detail":"Bad Request"})");
        co_await write(socket, bad, false);
        break;
      }
      buffer.erase(0, n);
      // No endpoint reads a body, and admission comes before reading one:
      // a request that sent a body is answered without reading it, and the
      // connection closes.
      if (req.content_length > 0) req.keep_alive = false;
      Response response = co_await route(req, socket);
      if (response.client_gone) break;
      const bool keep_alive = req.keep_alive && !stopping_;
      if (!co_await write(socket, response, keep_alive) || !keep_alive) break;
    }
    asio::error_code ignored;
    socket.shutdown(tcp::socket::shutdown_both, ignored);
    if (--sessions_ == 0 && stopping_) deadline_.cancel();
  }

  asio::awaitable<bool> write(tcp::socket& socket, const Response& r, bool keep_alive) {
    const std::string bytes = serialize(r, keep_alive);
    auto [ec, _] = co_await asio::async_write(socket, asio::buffer(bytes), as_tuple_awaitable);
    co_return !ec;
  }

  asio::awaitable<Response> route(const Request& req, tcp::socket& socket) {
    if (req.path != "/messages" && req.path != "/file" && req.path != "/health" &&
        req.path != "/stats") {
      Response r = reply(404, R"({"detail":"Not Found"})");
      co_return r;
    }
    if (req.method != "GET") {
      Response r = reply(405, R"({"detail":"Method Not Allowed"})");
      co_return r;
    }
    if (req.path == "/health") {
      std::string body = R"({"status":"ok","variant":)";
      append_json_string(body, options_.variant);
      body += R"(,"package":")" CL_VERSION R"(","pid":)" + std::to_string(::getpid());
      Response r = reply(200, body + "}");
      co_return r;
    }
    if (req.path == "/stats") {
      Response r = reply(200, stats());
      co_return r;
    }

    const bool messages = req.path == "/messages";
    cl::Permit permit;
    if (options_.limit) {
      // A client that hangs up while waiting leaves the queue at once
      // (counted as cancelled) instead of holding its place until a slot
      // frees up for nobody.
      using namespace asio::experimental::awaitable_operators;
      auto first = co_await (cl::async_acquire(limiter_, messages ? needs_db_ : needs_file_,
                                               limiter_.timeout(), as_tuple_awaitable) ||
                             client_gone(socket));
      if (first.index() == 1) {
        Response gone;
        gone.client_gone = true;
        co_return gone;
      }
      auto& [ec, p] = std::get<0>(first);
      if (ec) {
        Response busy = reply(503, std::string(kBusyBody));
        busy.retry_after = true;
        co_return busy;
      }
      permit = std::move(p);
    }
    // (Results go through locals: GCC 12 miscompiles co_await inside an
    // aggregate initializer.)
    Response response;
    try {
      if (messages) {
        const int user_id = std::uniform_int_distribution<int>(1, kUserCount)(rng_);
        response.body = co_await offload([this, user_id] {
          return query_messages(options_.db, user_id, queries_);
        });
      } else {
        response.content_type = "text/plain; charset=utf-8";
        response.body = co_await offload([this] { return read_file(options_.file); });
      }
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << std::endl;
      response = reply(500, R"({"detail":"Internal Server Error"})");
    }
    co_return response;
  }

  // Completes when the client has closed the connection (or it failed); never
  // for bytes the client sent ahead (a pipelined request). Ends at once when
  // cancelled.
  static asio::awaitable<void> client_gone(tcp::socket& socket) {
    auto [ec] = co_await socket.async_wait(tcp::socket::wait_read, as_tuple_awaitable);
    if (ec == asio::error::operation_aborted) co_return;  // the other side won
    if (!ec) {
      char byte;
      asio::error_code peek_ec;
      if (socket.receive(asio::buffer(&byte, 1), tcp::socket::message_peek, peek_ec) > 0) {
        asio::steady_timer never(socket.get_executor(), asio::steady_timer::time_point::max());
        co_await never.async_wait(as_tuple_awaitable);  // until cancelled
      }
    }
  }

  // Runs blocking `f` in the worker pool; this coroutine resumes on its own
  // executor when it is done, so no I/O thread waits for it.
  template <class F>
  asio::awaitable<std::string> offload(F f) {
    co_return co_await asio::co_spawn(
        pool_, [f = std::move(f)]() -> asio::awaitable<std::string> { co_return f(); },
        asio::use_awaitable);
  }

  std::string stats() const {
    std::string out = "{\"variant\":";
    append_json_string(out, options_.variant);
    out += ",\"queries_running\":" + std::to_string(queries_.running.load());
    out += ",\"queries_peak\":" + std::to_string(queries_.peak.load());
    out += ",\"queries_total\":" + std::to_string(queries_.total.load());
    for (const auto& s : limiter_.statistics()) {
      out += ",";
      append_json_string(out, s.name);
      out += ":{\"capacity\":" + std::to_string(s.capacity);
      out += ",\"in_use\":" + std::to_string(s.in_use);
      out += ",\"waiting\":" + std::to_string(s.waiting);
      out += ",\"peak_in_use\":" + std::to_string(s.peak_in_use);
      out += ",\"acquired\":" + std::to_string(s.acquired_total);
      for (const cl::Outcome o : {cl::Outcome::kTimeout, cl::Outcome::kQueueFull,
                                  cl::Outcome::kShed, cl::Outcome::kCancelled}) {
        out += ",\"" + std::string(cl::to_string(o)) + "\":" + std::to_string(s.rejected(o));
      }
      out += "}";
    }
    return out + "}";
  }

  asio::io_context& io_;
  const Options options_;
  asio::thread_pool pool_;
  tcp::acceptor acceptor_;
  std::shared_ptr<cl::Resource> db_, file_;
  cl::Limiter limiter_;
  std::shared_ptr<const cl::ResourceSet> needs_db_, needs_file_;
  QueryGauge queries_;
  std::minstd_rand rng_{std::random_device{}()};  // I/O thread only
  std::set<tcp::socket*> idle_;  // connections waiting for a request; I/O thread only
  bool stopping_ = false;        // I/O thread only
  int sessions_ = 0;             // open connections; I/O thread only
  asio::steady_timer deadline_{io_};  // ends a graceful stop that takes too long
};

[[noreturn]] void usage(const char* error) {
  std::cerr << "error: " << error << "\n"
            << "usage: demo_server --db PATH --file PATH [--host 127.0.0.1] [--port 8000]\n"
               "                   [--workers 40] [--timeout 2] [--no-limit] [--variant NAME]\n";
  std::exit(2);
}

Options parse_options(int argc, char** argv) {
  Options o;
  if (const char* v = std::getenv("SPIKE_DB")) o.db = v;
  if (const char* v = std::getenv("SPIKE_FILE")) o.file = v;
  if (const char* v = std::getenv("SPIKE_NO_LIMIT")) o.limit = std::string_view(v) != "1";
  if (const char* v = std::getenv("SPIKE_VARIANT")) o.variant = v;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value");
      return argv[++i];
    };
    if (arg == "--host") o.host = value();
    else if (arg == "--port") o.port = static_cast<unsigned short>(std::stoi(value()));
    else if (arg == "--db") o.db = value();
    else if (arg == "--file") o.file = value();
    else if (arg == "--workers") o.workers = std::stoi(value());
    else if (arg == "--no-limit") o.limit = false;
    else if (arg == "--variant") o.variant = value();
    else if (arg == "--timeout") o.timeout = std::chrono::milliseconds(std::lround(std::stod(value()) * 1000));
    else usage("unknown argument");
  }
  if (o.db.empty() || o.file.empty()) usage("--db and --file (or SPIKE_DB, SPIKE_FILE) are required");
  if (o.workers < 1) usage("--workers must be >= 1");
  if (o.variant.empty()) o.variant = o.limit ? "cpp" : "cpp-none";
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_options(argc, argv);
  if (!std::ifstream(options.db) || !std::ifstream(options.file)) {
    std::cerr << "error: " << options.db << " or " << options.file
              << " is missing; generate them with: python bench/spike/data.py\n";
    return 1;
  }
  try {
    asio::io_context io(1);  // one I/O thread, as one uvicorn worker
    Server server(io, options);
    asio::signal_set signals(io, SIGINT, SIGTERM);
    signals.async_wait([&](const asio::error_code& ec, int) {
      if (ec) return;
      server.stop(std::chrono::seconds(5));
      signals.cancel();
    });
    asio::co_spawn(io, server.accept_loop(), asio::detached);
    std::cout << "listening on http://" << options.host << ":" << server.port()
              << (options.limit ? "" : " (no limiter)") << std::endl;
    io.run();
    server.stop_workers();
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
