// Java side of the real-client matrix (tests/clients.rs), run as a single
// file: `java -Djdk.http.auth.tunneling.disabledSchemes= Client.java`.
//
// Every case runs through java.net.http.HttpClient (id suffix `-hc`) and
// HttpURLConnection (`-uc`). Input lines: id<TAB>METHOD<TAB>URL<TAB>BODY.
// Output lines: id<TAB>STATUS<TAB>TEXT, STATUS the HTTP status or `error`,
// TEXT what the API hands the user (the exception message, or the reason
// phrase where the API has one, and the body), on one line.
//
// The proxy is CLIENT_PROXY (host:port); cases whose id starts with `auth`
// go through CLIENT_AUTH_PROXY with an Authenticator for CLIENT_AUTH_USER /
// CLIENT_AUTH_PASS (the JDK sends proxy credentials only when challenged).
// The test CA is read from CLIENT_CA.

import java.io.BufferedReader;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.net.Authenticator;
import java.net.HttpURLConnection;
import java.net.InetSocketAddress;
import java.net.PasswordAuthentication;
import java.net.Proxy;
import java.net.ProxySelector;
import java.net.URI;
import java.net.URL;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyStore;
import java.security.cert.CertificateFactory;
import java.time.Duration;
import javax.net.ssl.HttpsURLConnection;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;

public class Client {
    static InetSocketAddress address(String env) {
        String[] hostPort = System.getenv(env).split(":");
        return new InetSocketAddress(hostPort[0], Integer.parseInt(hostPort[1]));
    }

    static SSLContext trustingTestCa() throws Exception {
        KeyStore store = KeyStore.getInstance(KeyStore.getDefaultType());
        store.load(null, null);
        try (InputStream in = Files.newInputStream(Path.of(System.getenv("CLIENT_CA")))) {
            store.setCertificateEntry("test-ca", CertificateFactory.getInstance("X.509").generateCertificate(in));
        }
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(store);
        SSLContext context = SSLContext.getInstance("TLS");
        context.init(null, tmf.getTrustManagers(), null);
        return context;
    }

    static final Authenticator CREDENTIALS = new Authenticator() {
        @Override
        protected PasswordAuthentication getPasswordAuthentication() {
            if (getRequestorType() != RequestorType.PROXY) {
                return null;
            }
            return new PasswordAuthentication(System.getenv("CLIENT_AUTH_USER"), System.getenv("CLIENT_AUTH_PASS").toCharArray());
        }
    };

    static String oneLine(String text) {
        return String.join(" ", String.valueOf(text).trim().split("\\s+"));
    }

    static String describe(Throwable e) {
        StringBuilder out = new StringBuilder();
        for (Throwable t = e; t != null; t = t.getCause()) {
            out.append(out.length() == 0 ? "" : " <- ").append(t.getClass().getName()).append(": ").append(t.getMessage());
        }
        return out.toString();
    }

    static String[] viaHttpClient(HttpClient client, String method, String url, String body) {
        try {
            HttpRequest.BodyPublisher publisher = body.isEmpty() ? HttpRequest.BodyPublishers.noBody() : HttpRequest.BodyPublishers.ofString(body);
            HttpRequest req = HttpRequest.newBuilder(URI.create(url)).timeout(Duration.ofSeconds(10)).method(method, publisher).build();
            HttpResponse<String> resp = client.send(req, HttpResponse.BodyHandlers.ofString());
            return new String[] {String.valueOf(resp.statusCode()), resp.body()};
        } catch (Exception e) {
            return new String[] {"error", describe(e)};
        }
    }

    static String[] viaUrlConnection(SSLContext tls, Proxy proxy, String method, String url, String body) {
        try {
            HttpURLConnection conn = (HttpURLConnection) new URL(url).openConnection(proxy);
            if (conn instanceof HttpsURLConnection https) {
                https.setSSLSocketFactory(tls.getSocketFactory());
            }
            conn.setConnectTimeout(10_000);
            conn.setReadTimeout(10_000);
            conn.setRequestMethod(method);
            if (!body.isEmpty()) {
                conn.setDoOutput(true);
                try (OutputStream out = conn.getOutputStream()) {
                    out.write(body.getBytes(StandardCharsets.UTF_8));
                }
            }
            int status = conn.getResponseCode();
            InputStream in = status >= 400 ? conn.getErrorStream() : conn.getInputStream();
            String text = in == null ? "" : new String(in.readAllBytes(), StandardCharsets.UTF_8);
            return new String[] {String.valueOf(status), conn.getResponseMessage() + " | " + text};
        } catch (Exception e) {
            return new String[] {"error", describe(e)};
        }
    }

    public static void main(String[] args) throws Exception {
        SSLContext tls = trustingTestCa();
        InetSocketAddress plainProxy = address("CLIENT_PROXY");
        InetSocketAddress authProxy = address("CLIENT_AUTH_PROXY");
        HttpClient plain = HttpClient.newBuilder().proxy(ProxySelector.of(plainProxy)).sslContext(tls).build();
        HttpClient withCredentials = HttpClient.newBuilder().proxy(ProxySelector.of(authProxy)).sslContext(tls).authenticator(CREDENTIALS).build();
        Authenticator.setDefault(CREDENTIALS);
        BufferedReader input = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        for (String line; (line = input.readLine()) != null; ) {
            if (line.isBlank()) {
                continue;
            }
            String[] f = (line + "\t\t\t").split("\t", -1);
            boolean auth = f[0].startsWith("auth");
            String[] hc = viaHttpClient(auth ? withCredentials : plain, f[1], f[2], f[3]);
            System.out.println(f[0] + "-hc\t" + hc[0] + "\t" + oneLine(hc[1]));
            Proxy proxy = new Proxy(Proxy.Type.HTTP, auth ? authProxy : plainProxy);
            String[] uc = viaUrlConnection(tls, proxy, f[1], f[2], f[3]);
            System.out.println(f[0] + "-uc\t" + uc[0] + "\t" + oneLine(uc[1]));
        }
    }
}
