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
