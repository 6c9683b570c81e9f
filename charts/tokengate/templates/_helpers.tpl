{{- define "tokengate.name" -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "tokengate.labels" -}}
app.kubernetes.io/name: tokengate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "tokengate.selector" -}}
app.kubernetes.io/name: tokengate
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tokengate.probes" -}}
livenessProbe:
  httpGet: {path: {{ .Values.probes.liveness.path }}, port: admin}
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
readinessProbe:
  httpGet: {path: {{ .Values.probes.readiness.path }}, port: admin}
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
{{- end -}}

{{- define "tokengate.env" -}}
env:
  - name: TOKENGATE_CONFIG
    value: /etc/tokengate/tokengate.yaml
{{- if .Values.extraEnvFromSecret }}
envFrom:
  - secretRef:
      name: {{ .Values.extraEnvFromSecret }}
{{- end }}
{{- end -}}

{{- /*
True ("true") when the authorization server keeps its store in PostgreSQL
(authserver.store.type: postgresql): a Deployment of several replicas, a migration Job.
The values are checked here, so every template that asks fails the same way.
*/ -}}
{{- define "tokengate.postgresql" -}}
{{- $store := .Values.authserver.store -}}
{{- $config := .Values.config.authserver | default dict -}}
{{- if or (hasKey $config "store") (hasKey $config "key_encryption_key") -}}
{{- fail "config.authserver.store and config.authserver.key_encryption_key are set by the chart: set authserver.store.type: postgresql and give the URL and key in a Secret (authserver.store.existingSecret)" -}}
{{- end -}}
{{- if not (has $store.type (list "sqlite" "postgresql")) -}}
{{- fail (printf "authserver.store.type must be sqlite or postgresql, not %v" $store.type) -}}
{{- end -}}
{{- if and .Values.authserver.enabled (eq $store.type "postgresql") -}}
{{- if $store.existingSecret -}}
{{- if or $store.url $store.keyEncryptionKey -}}
{{- fail "authserver.store: set either existingSecret or url and keyEncryptionKey, not both" -}}
{{- end -}}
{{- else -}}
{{- if not (and $store.url $store.keyEncryptionKey) -}}
{{- fail "authserver.store.type postgresql needs existingSecret (a Secret with store-url and key-encryption-key), or url and keyEncryptionKey" -}}
{{- end -}}
{{- if not (regexMatch "^postgres(ql)?://" $store.url) -}}
{{- fail "authserver.store.url must be a postgresql:// (or postgres://) URL" -}}
{{- end -}}
{{- if ne (len (b64dec $store.keyEncryptionKey)) 32 -}}
{{- fail "authserver.store.keyEncryptionKey must be 32 random bytes, base64 (openssl rand -base64 32)" -}}
{{- end -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{- /* The Secret holding store-url and key-encryption-key. */ -}}
{{- define "tokengate.storeSecret" -}}
{{- .Values.authserver.store.existingSecret | default (printf "%s-store" (include "tokengate.name" .)) -}}
{{- end -}}

{{- /*
The tokengate configuration is .Values.config, with these additions:
- a gateway issuer that is this release's own authorization server (issuer
  {public_url}/oauth2/{server}) and names no jwks_uri gets the in-cluster address of the
  release's authserver Service, so the gateway fetches keys inside the cluster whatever
  the release is called;
- with PostgreSQL, authserver.store and authserver.key_encryption_key are references to
  the environment (${TOKENGATE_STORE_URL}, ${TOKENGATE_KEK}), filled from the store's
  Secret: the values themselves are never in a ConfigMap.
*/ -}}
{{- define "tokengate.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- if and .Values.authserver.enabled $config.authserver $config.gateway -}}
{{- $public := trimSuffix "/" (toString $config.authserver.public_url) -}}
{{- $service := printf "http://%s-authserver:%v" (include "tokengate.name" .) .Values.authserver.service.port -}}
{{- range $issuer := ($config.gateway.issuers | default list) -}}
{{- if not $issuer.jwks_uri -}}
{{- range $server := ($config.authserver.servers | default list) -}}
{{- if eq (toString $issuer.issuer) (printf "%s/oauth2/%s" $public $server.name) -}}
{{- $_ := set $issuer "jwks_uri" (printf "%s/oauth2/%s/v1/keys" $service $server.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (include "tokengate.postgresql" .) $config.authserver -}}
{{- $_ := set $config.authserver "store" "${TOKENGATE_STORE_URL}" -}}
{{- $_ := set $config.authserver "key_encryption_key" "${TOKENGATE_KEK}" -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{- /*
The authserver's environment with PostgreSQL: tokengate.env plus the store's URL and key
from its Secret. The argument is (list $ "<secret name>").
*/ -}}
{{- define "tokengate.storeEnv" -}}
{{- $ := index . 0 -}}
{{- $secret := index . 1 -}}
env:
  - name: TOKENGATE_CONFIG
    value: /etc/tokengate/tokengate.yaml
  - name: TOKENGATE_STORE_URL
    valueFrom:
      secretKeyRef: {name: {{ $secret }}, key: store-url}
  - name: TOKENGATE_KEK
    valueFrom:
      secretKeyRef: {name: {{ $secret }}, key: key-encryption-key}
{{- if $.Values.extraEnvFromSecret }}
envFrom:
  - secretRef:
      name: {{ $.Values.extraEnvFromSecret }}
{{- end }}
{{- end -}}
