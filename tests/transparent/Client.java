// Test client for tests/transparent.rs: java.net.http.HttpClient with no
// proxy configured, run as a single file (`java Client.java case=URL ...`).
// Prints one JSON line per case.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.security.cert.X509Certificate;
import java.time.Duration;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManager;
import javax.net.ssl.X509TrustManager;

public class Client {
    public static void main(String[] args) throws Exception {
        // The origin's certificate is a test one; SNI is what matters here.
        TrustManager[] trustAll = {new X509TrustManager() {
            public void checkClientTrusted(X509Certificate[] chain, String auth) {}
            public void checkServerTrusted(X509Certificate[] chain, String auth) {}
            public X509Certificate[] getAcceptedIssuers() { return new X509Certificate[0]; }
        }};
        SSLContext ssl = SSLContext.getInstance("TLS");
        ssl.init(null, trustAll, null);
        HttpClient client = HttpClient.newBuilder().sslContext(ssl).connectTimeout(Duration.ofSeconds(10)).build();
        for (String arg : args) {
            int eq = arg.indexOf('=');
            String name = arg.substring(0, eq);
            String url = arg.substring(eq + 1);
            String line;
            try {
                HttpRequest req = HttpRequest.newBuilder(URI.create(url)).timeout(Duration.ofSeconds(10)).build();
                HttpResponse<String> r = client.send(req, HttpResponse.BodyHandlers.ofString());
                line = json(name, r.statusCode(), r.headers().firstValue("x-portcullis-deny").orElse(""), r.body(), "");
            } catch (Exception e) {
                line = json(name, -1, "", "", e.toString());
            }
            System.out.println(line);
        }
    }

    static String json(String name, int status, String deny, String body, String error) {
        return "{\"case\":" + str(name) + ",\"status\":" + status + ",\"deny\":" + str(deny) + ",\"body\":" + str(body)
                + ",\"error\":" + str(error) + "}";
    }

    static String str(String s) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }
}
